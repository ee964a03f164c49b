"""Candidate retrieval for search (encoder + BM25) and recommendation (user vector, co-engagement, popularity)."""
