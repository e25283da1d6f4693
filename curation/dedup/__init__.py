"""Duplicate and near-duplicate images: hashing, grouping, the dedup stage, its filter and report."""
