# KubeRay on EKS: an IAM role for the pods' service account (IRSA), with the same bucket access
# as the nodes. Only the service account k8s_namespace/k8s_service_account may assume it
# (clusters/kuberay-serviceaccount.yaml carries the role ARN as an annotation).

locals {
  oidc_issuer = trimprefix(var.eks_oidc_provider_url, "https://")
}

data "aws_iam_policy_document" "irsa_assume" {
  count = var.enable_irsa ? 1 : 0

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "irsa" {
  count              = var.enable_irsa ? 1 : 0
  name               = "${var.name_prefix}-irsa"
  description        = "sd2-ray KubeRay pods (service account ${var.k8s_namespace}/${var.k8s_service_account}): the artifacts bucket only."
  assume_role_policy = data.aws_iam_policy_document.irsa_assume[0].json

  lifecycle {
    precondition {
      condition     = var.eks_oidc_provider_arn != "" && var.eks_oidc_provider_url != ""
      error_message = "enable_irsa needs eks_oidc_provider_arn and eks_oidc_provider_url."
    }
  }
}

resource "aws_iam_role_policy_attachment" "irsa_bucket_access" {
  count      = var.enable_irsa ? 1 : 0
  role       = aws_iam_role.irsa[0].name
  policy_arn = aws_iam_policy.bucket_access.arn
}

resource "aws_iam_role_policy_attachment" "irsa_kms_access" {
  count      = var.enable_irsa && var.kms_key_arn != null ? 1 : 0
  role       = aws_iam_role.irsa[0].name
  policy_arn = aws_iam_policy.kms_access[0].arn
}
