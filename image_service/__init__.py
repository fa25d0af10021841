"""CRI ImageService for virtlet.cloud/<name> images: translation, download, validation, content-addressed store."""
