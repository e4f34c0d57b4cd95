"""medge: edge deployment of medical-imaging networks (work in progress)."""
