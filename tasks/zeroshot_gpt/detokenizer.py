"""Detokenizers of Megatron-LM's zero-shot tasks: undo the word-level tokenisation of PTB and
WikiText-103 (`` @-@ ``, `` , ``, ``( x )``, ``= = Title = =``...) before BPE, so the model
sees text as it was trained on. The rules and their order are Megatron's
(tasks/zeroshot_gpt/detokenizer.py); the perplexity of a file depends on every one of them."""

import re

# (literal, replacement) pairs, applied in order by str.replace.
_PTB_RULES = ((" '", "'"), (" \n", "\n"), ("\n ", "\n"), (" n't", "n't"), (" N ", "1 "),
              ("$ 1", "$1"), ("# 1", "#1"))

_WIKI_BEFORE_BRACKETS = (
    ("s '", "s'"),  # contractions
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),  # number separators
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "),
    (" , ", ", "),  # punctuation
)
# Spaces just inside paired brackets and quotes are removed: "( x )" -> "(x)".
_WIKI_BRACKETS = tuple((re.compile(pattern), repl) for pattern, repl in (
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    (r"'\s*([^']*?)\s*'", r"'\1'"),
))
_WIKI_AFTER_BRACKETS = (
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),  # heading markers
    (" \u00b0 ", "\u00b0"), (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"),
)
# Megatron's rule for quoted digits; it never matches real text (the slashes are literal) but
# is kept so that the output is Megatron's for every input.
_WIKI_QUOTED_DIGIT = (re.compile(r"/' [0-9]/"), r"/'[0-9]/")


def _replace_all(string, rules):
    for old, new in rules:
        string = string.replace(old, new)
    return string


def ptb_detokenizer(string):
    """Penn Treebank (Mikolov's ptb.*.txt) to plain text."""
    return _replace_all(string, _PTB_RULES)


def wikitext_detokenizer(string):
    """WikiText-103 (wiki.*.tokens) to plain text."""
    string = _replace_all(string, _WIKI_BEFORE_BRACKETS[:1])
    string = _WIKI_QUOTED_DIGIT[0].sub(_WIKI_QUOTED_DIGIT[1], string)
    string = _replace_all(string, _WIKI_BEFORE_BRACKETS[1:])
    for pattern, repl in _WIKI_BRACKETS:
        string = pattern.sub(repl, string)
    return _replace_all(string, _WIKI_AFTER_BRACKETS)


def lambada_detokenizer(string):
    """LAMBADA is plain text already."""
    return string


_DETOKENIZERS = {"ptb": ptb_detokenizer, "wiki": wikitext_detokenizer,
                 "lambada": lambada_detokenizer}


def get_detokenizer(path):
    """The detokenizer whose key ('ptb', 'wiki', 'lambada', checked in that order) occurs in
    ``path``, as Megatron chooses it; None when none does."""
    for key, detokenizer in _DETOKENIZERS.items():
        if key in path:
            return detokenizer
    return None
