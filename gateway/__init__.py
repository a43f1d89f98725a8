"""dicom-gateway: a durable DICOM Storage SCP that indexes, stores and routes every instance."""

__version__ = "0.1.0"

# Our own DICOM Implementation Class UID (a UUID-derived 2.25 UID, fixed forever) and
# version name (max 16 characters), sent in association negotiation and file meta.
IMPLEMENTATION_CLASS_UID = "2.25.321249653668985314918528011591153932883"
IMPLEMENTATION_VERSION_NAME = f"DICOMGW_{__version__}"[:16]
