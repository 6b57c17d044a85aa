"""LightningDataModules for glauber: tokenised text and VQ-tokenised images."""
