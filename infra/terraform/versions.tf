# Terraform and provider versions this module was written against.
terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region

  # Every resource carries these tags (cost allocation, ownership).
  default_tags {
    tags = merge({ project = "sd2-ray" }, var.tags)
  }
}
