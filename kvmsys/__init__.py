"""kvmsys"""
