"""imgserve client SDK: talks to the gateway over gRPC or HTTP only (no torch, no serving import)."""
