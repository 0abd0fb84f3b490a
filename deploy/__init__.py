"""Deployment tooling: certificates and keys (make_certs), the image's requirements (requirements), lint.sh."""
