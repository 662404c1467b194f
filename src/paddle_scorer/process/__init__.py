"""Process-wide concerns, below everything else: threads and environment set before numpy and paddle load, the one
paddle import, the launcher's worker identity, stop signals held while results are published, the cache folder."""
