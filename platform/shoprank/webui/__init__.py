"""The Gradio page and the simulated traffic: clients of the Serve app over HTTP only."""
