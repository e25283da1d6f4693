"""Exports of the curated shards to layouts that trainers read as they are (`pixart`: PixArt-alpha)."""
