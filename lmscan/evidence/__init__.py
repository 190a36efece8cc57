"""What the detectors share, so that no detector imports another.

- site_reader: read several feature sites from one forward pass; insert tokens; spelling pieces
- heldout: VerifyConfig and the held-out verification every detector confirms a trigger with
- class_cues: the opposite test, class marks and class words (class cue or backdoor)
- trigger_findings: the one builder of trigger and class-cue findings, and reading triggers back
- soft_prompt: soft-prompt helpers of PV mining and PICCOLO
"""
