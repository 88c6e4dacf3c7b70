"""Multi-teacher feature distillation (AM-RADIO / UNIC / Theia style)."""
