"""Building and running the function images with a local container engine (podman or
docker): ``make images``, the container mode of the local runtime, the image tests."""
