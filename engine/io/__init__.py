"""Files: self-contained safetensors checkpoints, format detection, safe unpickling, DALLE-pytorch imports and
atomic writes."""
