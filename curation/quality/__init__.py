"""Quality signals from one CLIP pass: image embeddings, LAION's aesthetic and NSFW heads on them, and CLIP scores of
each caption set against its images.

`model.py` holds the CLIP model and both heads (`QualityModel`, loaded once per worker in `setup()`) and `clip_score`;
`heads.py` the heads' architectures and their loading from a Hub file or a local one (state dicts, never pickles).
"""
