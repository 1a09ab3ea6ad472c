"""Activity recognition over streams: accelerometer streams (data.py), a 1D-convolutional
classifier served as a stream model (activity.py), its training (train.py), a client that plays
many devices (client.py) and a page that streams one (page.html). README.md says how."""
