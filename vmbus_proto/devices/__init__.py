"""Device protocol catalogues: one module per Hyper-V synthetic device, shared by its VSP and its VSC."""
