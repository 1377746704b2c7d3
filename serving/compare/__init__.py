"""``imgserve bench --compare``: is the gateway worth its hop? One interleaved run of four paths.

For the same models, concurrencies and image sizes it measures, round after round:

* ``ort``: raw ONNX Runtime on the repository's ``model.onnx`` with pre-decoded uint8
  batches of ``c`` images (the engine's ceiling, no serving at all);
* ``gateway``: ``imgserve serve`` with the embedded backend, one encoded image per
  request to its Open Inference Protocol endpoint (``tritonclient.grpc.aio``);
* ``triton``: ``imgserve triton-local`` directly, the client decoding and cropping
  each image exactly as the gateway does and sending uint8 tensors;
* ``gateway-triton``: the gateway with ``--backend triton`` in front of that Triton.

Why it lives in ``serving/`` and not in ``clients/``: it starts gateways and Triton,
loads ONNX Runtime sessions and preprocesses with the gateway's own code
(``serving.preprocess``), so it needs the ``serve`` (and for Triton the ``triton``)
extra, which ``clients/`` must never require. ``imgserve bench --compare`` reaches it
through the CLI's by-name forwarding (``clients.cli``), like ``imgserve serve``;
heavy imports (tritonclient, matplotlib) happen only when used.
"""
