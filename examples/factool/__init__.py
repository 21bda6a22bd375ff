"""FacTool-style knowledge-based fact checker: claims -> queries -> search -> verify -> report."""
