terraform {
  required_version = ">= 1.5.0"

  required_providers {
    digitalocean = {
      source  = "digitalocean/digitalocean"
      version = "~> 2.40"
    }
  }
}

# Credentials: DIGITALOCEAN_TOKEN in the environment; never in a .tf file.
provider "digitalocean" {}
