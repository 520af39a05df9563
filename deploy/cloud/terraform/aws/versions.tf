terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

# Credentials: the usual AWS environment (AWS_PROFILE, SSO, instance role);
# never in a .tf file.
provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ "ztna:role" = "relay", "ztna:name" = var.name }, var.tags)
  }
}
