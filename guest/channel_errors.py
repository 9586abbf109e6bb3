"""Failures of the shared-memory channel, one type each so callers (and ``mbctl``'s exit
codes) can tell a missing device from a full ring or a host that never answered."""


class ChannelError(Exception):
    """Base of every channel failure; its message is meant for the operator."""


class DeviceNotFound(ChannelError):
    """No region to open: no ivshmem device, no such file or shared-memory object."""


class RegionTooSmall(ChannelError):
    """The region cannot hold the smallest ring."""


class BadRegion(ChannelError):
    """The region holds something else: wrong magic, another protocol version, bad geometry."""


class CommandTooLong(ChannelError):
    """The command does not fit one slot of this region's ring; nothing was sent."""


class RingFull(ChannelError):
    """Every slot holds a command the host has not answered yet (or an answer not yet read)."""


class ChannelBusy(ChannelError):
    """Another writer held the channel's lock until the deadline; nothing was sent."""


class AnswerLost(ChannelError):
    """The command was answered, but its writer had not read the answer by the time it
    promised (its collect-by time), so another writer reused the slot."""

    def __init__(self, message: str, seq: int):
        super().__init__(message)
        self.seq = seq


class ResponseTimeout(ChannelError):
    """The command is in the ring but the host did not answer in time; it stays pending."""

    def __init__(self, message: str, seq: int):
        super().__init__(message)
        self.seq = seq


class ChannelReset(ChannelError):
    """The region was re-initialised (new epoch) while a command waited for its answer."""
