"""What a dist_llama checkpoint is on disk, and how to read it without trusting it: the manifest and
its integrity checks (integrity.py), opening only the regular files a manifest names and holding a
checkpoint against retention while it is read (files.py), DCP's .metadata through a restricted
unpickler (dcp_metadata.py), DeepSpeed's files with weights_only loading (deepspeed.py).

Below both train/ (which writes checkpoints) and weights/ (which reads them as weights): it imports
neither, so neither imports the other for it.
"""
