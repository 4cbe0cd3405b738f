variable "region" {
  description = "AWS region of the bucket and the cluster (keep them together: no cross-region transfer)."
  type        = string
  default     = "us-west-2"
}

variable "bucket_name" {
  description = "Name of the artifacts bucket (globally unique): prompts, distilled data, checkpoints, drafters, reports."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 lowercase letters, digits, dots or hyphens."
  }
}

variable "name_prefix" {
  description = "Prefix of the IAM roles, profiles, policies and the ECR repository."
  type        = string
  default     = "sd2-ray"
}

variable "cluster_name" {
  description = "cluster_name of clusters/aws-gpu.yaml: the head may only stop/terminate instances tagged ray-cluster-name=<this>."
  type        = string
  default     = "sd2-ray"
}

variable "checkpoints_prefix" {
  description = "Key prefix for training checkpoints (point finetune/tune storage there); objects under it expire."
  type        = string
  default     = "checkpoints/"
}

variable "checkpoint_expiration_days" {
  description = "Days after which objects under checkpoints_prefix are deleted."
  type        = number
  default     = 30
}

variable "noncurrent_version_expiration_days" {
  description = "Days an overwritten or deleted object version is kept (versioning protects against mistakes, not forever)."
  type        = number
  default     = 14
}

variable "kms_key_arn" {
  description = "KMS key for bucket encryption; null uses S3-managed keys (SSE-S3, AES256)."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete a non-empty bucket (keep false outside experiments)."
  type        = bool
  default     = false
}

variable "create_ecr_repository" {
  description = "Create the ECR repository for the cluster image (infra/docker/Dockerfile) and let the nodes pull from it."
  type        = bool
  default     = true
}

variable "enable_irsa" {
  description = "Create an IAM role for the KubeRay pods' service account (EKS IRSA) with the same bucket access."
  type        = bool
  default     = false
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (needed when enable_irsa)."
  type        = string
  default     = ""
}

variable "eks_oidc_provider_url" {
  description = "Issuer URL of the EKS cluster's OIDC provider, with or without https:// (needed when enable_irsa)."
  type        = string
  default     = ""
}

variable "k8s_namespace" {
  description = "Namespace of the service account in clusters/kuberay-serviceaccount.yaml."
  type        = string
  default     = "default"
}

variable "k8s_service_account" {
  description = "Name of the service account in clusters/kuberay-serviceaccount.yaml."
  type        = string
  default     = "sd2-ray"
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
