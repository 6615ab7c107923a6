"""The model stages: Ray Serve deployments over klein/, one per pipeline stage, tensors in and out.

    TextEmbedder.embed -> (Codec.encode for references) -> FlowTransformer.denoise -> Codec.finish

Each batches its requests (`@serve.batch`, gated: a busy stage gathers what arrives into its next
batch), runs all torch work on one worker thread, and knows nothing of jobs or storage layouts: the
FlowTransformer is handed a cancel check, the Codec the key to upload to. `payloads` is what travels
between them.
"""
