"""The paper's studies and analyses: the end-to-end study (`study`, `report`), router against oracle
(`router_comparison`), the dense against Duo ablation (`ablation`), and their presets (`presets`)."""
