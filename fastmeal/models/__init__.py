"""Models: students and teachers from timm tags, the discriminator."""
