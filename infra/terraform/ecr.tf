# Registry for the cluster image built from infra/docker/Dockerfile.

resource "aws_ecr_repository" "cluster" {
  count = var.create_ecr_repository ? 1 : 0
  name  = var.name_prefix

  # A tag names one build forever (0.1.0-cu130): clusters and jobs are reproducible.
  image_tag_mutability = "IMMUTABLE"

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "AES256"
  }
}

# Keep the last 20 images; the CUDA images are ~10 GB each.
resource "aws_ecr_lifecycle_policy" "cluster" {
  count      = var.create_ecr_repository ? 1 : 0
  repository = aws_ecr_repository.cluster[0].name

  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "keep the 20 most recent images"
      selection = {
        tagStatus   = "any"
        countType   = "imageCountMoreThan"
        countNumber = 20
      }
      action = { type = "expire" }
    }]
  })
}
