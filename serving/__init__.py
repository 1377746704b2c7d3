"""imgserve gateway: decoding, 10-crop TTA, dynamic batching and protocols in front of a backend."""
