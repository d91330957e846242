"""Cross-modal safety alignment by textual unlearning: a minimal, readable LLaVA-1.5 reference."""
