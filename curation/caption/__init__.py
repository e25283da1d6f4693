"""Caption stage: LLaVA captioning of image shards."""
