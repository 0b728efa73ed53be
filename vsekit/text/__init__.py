from vsekit.text.tokenizer import tokenize
from vsekit.text.vocab import Vocabulary

__all__ = ["tokenize", "Vocabulary"]
