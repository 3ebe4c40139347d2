# twotower:local from a release binary built on the host: scripts/stack.sh stages the stripped
# binary, the libtorch libraries it loads, the pipelines and deploy/ into deploy/context/ and
# builds there. No compiler in the image; the base carries the runtime libraries.
FROM twotower-base:bookworm
COPY lib/ /opt/libtorch/lib/
COPY twotower /usr/local/bin/twotower
COPY pipelines /app/pipelines
COPY deploy /app/deploy
ENV LD_LIBRARY_PATH=/opt/libtorch/lib OMP_WAIT_POLICY=PASSIVE
WORKDIR /work
EXPOSE 50051 9464
CMD ["twotower", "--help"]
