# Build stage: the official Rust image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p handoff --bin handoff
# The release profile keeps line tables for profiling (about 40 MB); the image ships the
# binary without them.
RUN strip --strip-debug -o /src/handoff /src/target/release/handoff

# Runtime stage: slim Debian, unprivileged user.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin handoff
COPY --from=build /src/handoff /usr/local/bin/handoff
USER handoff
ENV HANDOFF_LISTEN=0.0.0.0:6432 \
    HANDOFF_ADMIN_LISTEN=0.0.0.0:6480
EXPOSE 6432 6480
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/handoff", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/handoff"]
