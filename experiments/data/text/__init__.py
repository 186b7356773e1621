"""Offline text data: KJV/WEB verse pairs, English paragraphs, a SentencePiece vocab, span corruption."""
