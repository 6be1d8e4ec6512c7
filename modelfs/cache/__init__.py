"""The chunk cache's parts: the buffer pool (``pool``)."""
