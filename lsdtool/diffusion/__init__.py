"""Noise schedules and graphs of discrete diffusion (DESIGN §4)."""

from lsdtool.diffusion.graphs import Absorb, Graph, Uniform, graph_of, make_graph
from lsdtool.diffusion.gaussian import Gaussian  # registers the ordinal graph with make_graph
from lsdtool.diffusion.noise import Geometric, LogLinear, Noise, make_noise

__all__ = ["Absorb", "Gaussian", "Graph", "Uniform", "graph_of", "make_graph", "Geometric", "LogLinear", "Noise", "make_noise"]
