"""The thin asyncio shell over vmbus_proto: framed transport, flow control and awaitable channels."""
