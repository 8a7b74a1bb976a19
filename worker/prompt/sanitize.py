"""One sanitiser for every untrusted text that enters a prompt.

Everything in a prompt except its role markers comes from outside: the player's message and name,
earlier lines brought back as history or memories, story events and their scenes, and the whole
character card (name, description, system prompt, example dialogue, lore). None of it may open a
turn of its own. So every piece of text goes through the builder's `clean` (this module, then the
format's escape):

- control characters other than newline and tab are dropped, CRLF becomes LF;
- special-token strings of the model's tokenizer (`<|im_start|>`, `<|im_end|>`, …) are broken with a
  zero-width space, so they tokenize as plain text and never as the special token;
- the prompt format's own text role markers (`### User:` for SOLAR, a `Human:` line for EEVE, a
  `<name>:` line for the GPT-OSS dialogue simulation) are broken the same way (`PromptFormat.escape`
  in formats.py, applied right after).

Names used as speaker labels (the character's, the player's) must also stay on one line:
`Sanitizer.label` folds them. Everything here is idempotent, so cleaning twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import regex

from core.text import DISGUISE, nfkc_keeping_jamo, speaker_key

ZWSP = "\u200b"
# C0 and C1 controls except tab and newline, plus DEL; and the Unicode line/paragraph separators (the
# writers' desk refuses a writer's text holding one).
CONTROLS = regex.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
MAX_LABEL = 200  # characters, as names are stored (characters.name, conversations.player_name)
_OPENING_BRACKET = regex.compile(r"^([\s\p{Cf}]*)\[")  # a label opening as a bracketed marker


# An added token that is a word (a vocabulary expansion's Korean syllables), not markup: a text holding
# it is the word, and broken it would cost the prompt tokens and the model its meaning (review: every
# added token was broken, special or not). A non-special one that is markup (`<|im_start|>` a
# fine-tune added plain) is still broken.
_PLAIN_WORD = regex.compile(r"[\p{L}\p{M}\p{N}\u2581 ]+")

NARRATOR_LABEL = "Narrator"  # the narrator's lines open with it, wherever dialogue is shown


class Sanitizer:
    """Cleans untrusted text for one tokenizer (the format's markers are escaped by the caller's
    format, formats.py, since they depend on the speakers' names)."""

    def __init__(self, tokenizer: Any) -> None:
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        specials = set(getattr(tokenizer, "all_special_tokens", [])) | {
            t.content for t in added if t.special or not _PLAIN_WORD.fullmatch(t.content)
        }
        self._specials = sorted((s for s in specials if len(s) > 1), key=len, reverse=True)
        # One search for any of them: most texts hold none, and a tokenizer may have hundreds of
        # special tokens (Llama 3 reserves 256), each otherwise looked for in every text cleaned.
        self._any_special = (
            regex.compile("|".join(regex.escape(s) for s in self._specials)) if self._specials else None
        )

    @property
    def specials(self) -> list[str]:
        """The tokenizer's special-token strings, longest first."""
        return list(self._specials)

    def defang(self, text: str) -> str:
        """Break special-token strings so they tokenize as plain text."""
        if self._any_special is None or not self._any_special.search(text):
            return text
        for token in self._specials:
            if token in text:
                text = text.replace(token, token[0] + ZWSP + token[1:])
        return text

    def scrub(self, text: str) -> str:
        """Control characters dropped, line ends normalised, special-token strings broken."""
        return self.defang(CONTROLS.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))

    def label(self, name: str, default: str) -> str:
        """A speaker name made safe as a label: NFKC ("Ｅｌａｒａ" is "Elara", "：" a colon; Korean
        compatibility jamo kept as written, "ㅋㅋ민수" not turned into conjoining jamo), no
        invisible characters that only disguise it (core/text.py), scrubbed and folded onto one
        line, and never opening as the prompt's bracketed markers ("[Scene direction]: …");
        `default` if empty."""
        # NFKC but its Korean jamo, which the NPC would repeat as a name the player never wrote
        # and many game fonts cannot draw; before scrub's ZWSPs.
        visible = nfkc_keeping_jamo(DISGUISE.sub("", name))
        # At most a name's stored length once NFKC-normalised: "\ufdfa" alone is 18 characters, and a
        # name of 200 of them a label of 3,600 written before every line of the prompt.
        folded = " ".join(self.scrub(visible).split())[:MAX_LABEL].rstrip() or default
        # Invisible characters kept (ZWJ, ZWNJ: emoji, Persian names) may stand before the bracket:
        # "\u200d[Scene direction]" opened a player's every line as a scene direction.
        return _OPENING_BRACKET.sub(lambda m: m.group(1) + "[" + ZWSP, folded, count=1)

    @staticmethod
    def among(label: str, others: Sequence[str]) -> str:
        """The label, unable to open a line as one of the `others`: "Rowan: take the keys. Alex" is
        the player's name, and "Rowan: …" would open the line as Rowan's (names compared as
        core/text.py's speaker_key compares them, at every colon: "Dr. Who: Origins: …")."""
        names = {speaker_key(other) for other in others if other}
        for at, char in enumerate(label):
            if char == ":" and speaker_key(label[:at]) in names:
                if label[:at].endswith(ZWSP):  # escaped already (speaker_key does not see the ZWSP)
                    return label
                return label[:at] + ZWSP + label[at:]
        return label

    def speaker_labels(self, char_name: str, player_name: str) -> tuple[str, str]:
        """The character's and the player's labels, told apart when the player is named like the
        character (any case), neither opening as the other: every prompt, the desk's check and the
        memory jobs use these."""
        char, user = self.label(char_name, "Character"), self.label(player_name, "User")
        # A player named "Narrator" is told apart everywhere, not only in a narrated turn: a
        # conversation the narrator spoke in shows its lines as "Narrator: ...", retrieved lines and
        # memory jobs' dialogue too, and the player's would read as narration.
        if speaker_key(user) in (speaker_key(char), speaker_key(NARRATOR_LABEL)):
            user = f"{user} (player)"
        return self.among(char, [user]), self.among(user, [char])
