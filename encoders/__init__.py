"""The models: loading, device choice, media decoding, one handler per modality, fusion."""
