output "bucket_name" {
  description = "The artifacts bucket: use s3://<bucket_name>/<run>/ in jobs/configs."
  value       = aws_s3_bucket.artifacts.bucket
}

output "bucket_arn" {
  description = "ARN of the artifacts bucket."
  value       = aws_s3_bucket.artifacts.arn
}

output "head_instance_profile_arn" {
  description = "IamInstanceProfile.Arn of head_cpu in clusters/aws-gpu.yaml."
  value       = aws_iam_instance_profile.head.arn
}

output "worker_instance_profile_arn" {
  description = "IamInstanceProfile.Arn of the worker types in clusters/aws-gpu.yaml."
  value       = aws_iam_instance_profile.worker.arn
}

output "head_role_arn" {
  description = "Role behind the head instance profile."
  value       = aws_iam_role.head.arn
}

output "worker_role_arn" {
  description = "Role behind the worker instance profile."
  value       = aws_iam_role.worker.arn
}

output "bucket_access_policy_arn" {
  description = "The bucket-only policy, to attach to other principals (CI, notebooks)."
  value       = aws_iam_policy.bucket_access.arn
}

output "irsa_role_arn" {
  description = "eks.amazonaws.com/role-arn of clusters/kuberay-serviceaccount.yaml (null unless enable_irsa)."
  value       = var.enable_irsa ? aws_iam_role.irsa[0].arn : null
}

output "ecr_repository_url" {
  description = "Where to push infra/docker's image; docker.image in clusters/aws-gpu.yaml (null unless create_ecr_repository)."
  value       = var.create_ecr_repository ? aws_ecr_repository.cluster[0].repository_url : null
}
