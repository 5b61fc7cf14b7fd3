"""What a real ONNX Runtime session was configured with, read back from the session itself."""

from __future__ import annotations


def spinning_entry(backend) -> str | None:
    """``session.intra_op.allow_spinning`` of a backend's session: "0", "1", or None (ONNX Runtime's default)."""
    try:
        return backend.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except Exception:  # onnxruntime raises a plain error for a key never set
        return None
