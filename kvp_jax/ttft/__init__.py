"""The one interface every way to the first token implements (method.py), below the methods and their runners."""
