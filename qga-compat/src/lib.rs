//! The qmp-dispatcher behind the QEMU guest agent's wire protocol.
