# IAM for the Ray cluster nodes (clusters/aws-gpu.yaml): least privilege to the artifacts bucket.
#   worker role: the bucket (+ pulling the cluster image);
#   head role:   the same, plus what the Ray autoscaler needs to launch and stop this cluster's
#                workers (EC2 scoped by the ray-cluster-name tag, PassRole of the worker role only).

locals {
  bucket_arn = aws_s3_bucket.artifacts.arn
  # The repository the nodes may pull from (none when the image lives elsewhere).
  ecr_repository_arns = var.create_ecr_repository ? [aws_ecr_repository.cluster[0].arn] : []
}

# --- bucket access, shared by every role ------------------------------------------------------

data "aws_iam_policy_document" "bucket_access" {
  # Listing (storage.list_files, manifests, resume) is a bucket-level action.
  statement {
    sid       = "ListArtifactsBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [local.bucket_arn]
  }

  # Reading and writing objects under the bucket only (atomic writes = put + delete).
  statement {
    sid = "ReadWriteArtifacts"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${local.bucket_arn}/*"]
  }
}

resource "aws_iam_policy" "bucket_access" {
  name        = "${var.name_prefix}-bucket-access"
  description = "Read/write the sd2-ray artifacts bucket ${var.bucket_name} and nothing else in S3."
  policy      = data.aws_iam_policy_document.bucket_access.json
}

# With a customer KMS key, the nodes also need to use that key (and only it).
data "aws_iam_policy_document" "kms_access" {
  count = var.kms_key_arn == null ? 0 : 1

  statement {
    sid       = "UseBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_policy" "kms_access" {
  count  = var.kms_key_arn == null ? 0 : 1
  name   = "${var.name_prefix}-kms-access"
  policy = data.aws_iam_policy_document.kms_access[0].json
}

# --- pulling the cluster image ----------------------------------------------------------------

data "aws_iam_policy_document" "ecr_pull" {
  count = var.create_ecr_repository ? 1 : 0

  # `aws ecr get-login-password` cannot be scoped to a repository.
  statement {
    sid       = "EcrLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }

  statement {
    sid       = "PullClusterImage"
    actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]
    resources = local.ecr_repository_arns
  }
}

resource "aws_iam_policy" "ecr_pull" {
  count  = var.create_ecr_repository ? 1 : 0
  name   = "${var.name_prefix}-ecr-pull"
  policy = data.aws_iam_policy_document.ecr_pull[0].json
}

# --- node roles and instance profiles -----------------------------------------------------------

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "worker" {
  name               = "${var.name_prefix}-worker"
  description        = "sd2-ray Ray worker nodes: the artifacts bucket only."
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role" "head" {
  name               = "${var.name_prefix}-head"
  description        = "sd2-ray Ray head node: the artifacts bucket and autoscaling of its own workers."
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

locals {
  node_roles = {
    head   = aws_iam_role.head.name
    worker = aws_iam_role.worker.name
  }
}

resource "aws_iam_role_policy_attachment" "bucket_access" {
  for_each   = local.node_roles
  role       = each.value
  policy_arn = aws_iam_policy.bucket_access.arn
}

resource "aws_iam_role_policy_attachment" "kms_access" {
  for_each   = var.kms_key_arn == null ? {} : local.node_roles
  role       = each.value
  policy_arn = aws_iam_policy.kms_access[0].arn
}

resource "aws_iam_role_policy_attachment" "ecr_pull" {
  for_each   = var.create_ecr_repository ? local.node_roles : {}
  role       = each.value
  policy_arn = aws_iam_policy.ecr_pull[0].arn
}

resource "aws_iam_instance_profile" "worker" {
  name = "${var.name_prefix}-worker"
  role = aws_iam_role.worker.name
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.name_prefix}-head"
  role = aws_iam_role.head.name
}

# --- the autoscaler on the head -----------------------------------------------------------------

data "aws_iam_policy_document" "autoscaler" {
  # The node provider looks up instances, subnets, security groups, images, key pairs.
  statement {
    sid       = "Describe"
    actions   = ["ec2:Describe*"]
    resources = ["*"]
  }

  # Launching needs the image, subnet, security group, key pair and volume resources too,
  # which RunInstances cannot be scoped to by tag; the launched instance is tagged on creation.
  statement {
    sid       = "LaunchWorkers"
    actions   = ["ec2:RunInstances"]
    resources = ["*"]
  }

  # Tags only at launch (ray-cluster-name, ray-node-type, ...), or on this cluster's instances.
  statement {
    sid       = "TagOnLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["arn:aws:ec2:*:*:instance/*", "arn:aws:ec2:*:*:volume/*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "ManageOwnWorkers"
    actions   = ["ec2:CreateTags", "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"]
    resources = ["arn:aws:ec2:*:*:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }

  # The head starts workers with the worker profile, and only that one.
  statement {
    sid       = "PassWorkerRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.worker.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }

  statement {
    sid       = "ReadInstanceProfiles"
    actions   = ["iam:GetInstanceProfile"]
    resources = [aws_iam_instance_profile.worker.arn, aws_iam_instance_profile.head.arn]
  }
}

resource "aws_iam_policy" "autoscaler" {
  name        = "${var.name_prefix}-autoscaler"
  description = "Ray autoscaler on the sd2-ray head: launch/stop instances of cluster ${var.cluster_name}."
  policy      = data.aws_iam_policy_document.autoscaler.json
}

resource "aws_iam_role_policy_attachment" "autoscaler" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.autoscaler.arn
}
