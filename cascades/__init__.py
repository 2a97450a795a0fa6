"""facepipe's own copies of Viola–Jones Haar cascade files (see README.md here).

Installed as the package ``facepipe.cascades`` so the Haar detector works even with
an OpenCV build that ships no cascades (OpenCV 5).
"""
