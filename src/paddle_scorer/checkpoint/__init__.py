"""Reading checkpoint files, without paddle: the restricted pickle walker, the two weight formats, where each
tensor's bytes are, the small files next to weights, LoRA settings, what a folder holds, content fingerprints."""
