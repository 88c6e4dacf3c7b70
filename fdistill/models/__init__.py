"""Models: the FD student (timm BEiT with shared relative position bias) and the projector."""
from .projector import TokenProjector
from .student import POS_EMBEDS, STUDENT_SIZES, FDStudent, create_student, visible_index

__all__ = ["FDStudent", "create_student", "TokenProjector", "STUDENT_SIZES", "POS_EMBEDS", "visible_index"]
