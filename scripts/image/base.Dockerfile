# The base of imgserve's images: a Debian bookworm root filesystem that debootstrap made from
# Debian's packages (minbase + python3 + python3-venv + ca-certificates; no compilers).
# Context: build/base/ (scripts/image/debian-base.sh writes rootfs.tar there).
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8
CMD ["/bin/bash"]
