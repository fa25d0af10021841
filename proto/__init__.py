"""Protocol definitions vmlet speaks (the Kubernetes CRI) and their generated Python modules."""
