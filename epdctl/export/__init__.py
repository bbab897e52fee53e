"""Exporters: a topology written out for another launcher (Kubernetes manifests, a shell script)."""
